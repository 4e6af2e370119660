"""Model configuration: one dataclass, validated at construction (the named presets: unipool/presets.py).

Expert storage is described by three numbers that cover every mode:

    n_pools      how many expert pools exist (layerwise: L, pool: 1, grouped: G)
    num_experts  experts in each pool = the width of every router (E, M, or M per group)
    layer -> pool: layer l uses pool l // (n_layers // n_pools)

so vanilla MoE ("layerwise"), UniPool ("pool") and grouped sharing ("grouped") are one code path.
Fine-grained experts (granularity g) split every expert into g experts of ffn_hidden // g and route
top_k * g of num_experts * g, which keeps active FLOPs and parameters fixed.

Counting words, used the same way everywhere:
    num_experts        experts per pool as configured (full-size units)
    n_routed_experts   experts per pool after the fine-grained split = each router's width; E (or M for
                       a shared pool) in shape names, `n_experts` inside router.py / moe.py, and
                       "experts_per_pool" in JSON reports
    n_pools            pools; experts stored in all = n_pools * n_routed_experts
    routed_top_k       experts each token picks in each layer (top_k * granularity)

The config is frozen: derive a changed one with `replace(...)`. How a forward runs (expert kernels,
the fused pool weight gradient, activation checkpointing, compile) is not part of it: see
`Unipool.set_execution` and a run's `exec` section.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from unipool.errors import UnipoolError

MOE_MODES = ("layerwise", "pool", "grouped")
ROUTERS = ("softmax", "norm", "sigmoid", "random")
POOL_LOSS_STATS = ("previous", "current")
BALANCE_SCORES = ("raw", "normalized")
NORM_ROUTER_SCALES = ("linear", "softplus", "exp")
DEPTH_EMBEDDINGS = ("none", "zeros", "normal")
SWITCH_LOSS_WIDTHS = ("pool", "candidates")
# Execution settings that earlier versions kept in the model config; from_dict drops them (a run's
# config moves their values to its `exec` section).
LEGACY_EXEC_FIELDS = ("dispatch", "fused_pool_wgrad")


def _positive_number(v: Any) -> bool:
    """A positive finite number, or a string that parses as one ("match_gate:0.19")."""
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return False
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf


class ConfigError(UnipoolError, ValueError):
    """A configuration value is invalid; the message names the field."""


def type_options(tp: Any) -> tuple:
    """The alternatives of a field annotation: `int | None` -> (int, NoneType), `float` -> (float,)."""
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def type_name(tp: Any) -> str:
    """An annotation as an error message names it: `int`, `int | None`, `list[str]`."""
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _has_type(value: Any, tp: Any) -> bool:
    """Whether `value` fits the annotation `tp` (float accepts an int; bool is never a number)."""
    for opt in type_options(tp):
        if opt is type(None) and value is None:
            return True
        if opt is bool and isinstance(value, bool):
            return True
        if opt in (int, float) and isinstance(value, int if opt is int else (int, float)) and not isinstance(value, bool):
            return True
        if opt is str and isinstance(value, str):
            return True
        if typing.get_origin(opt) is list and isinstance(value, list):
            return True
    return False


def check_types_and_finite(obj: Any, section: str) -> None:
    """Every field of dataclass `obj` has its annotated type, and every float is finite: a config read
    from a damaged file or a command line (`Infinity`, `NaN`) fails here in one line, not in training."""
    for name, tp in typing.get_type_hints(type(obj)).items():
        value = getattr(obj, name)
        if not _has_type(value, tp):
            raise ConfigError(f"{section}.{name}: expected {type_name(tp)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{section}.{name}: must be a finite number (got {value!r})")


@dataclass(frozen=True)
class ModelConfig:
    # --- backbone (LLaMA-style) ---
    vocab_size: int = 50257  # real vocabulary; the embedding is padded (see vocab_multiple)
    vocab_multiple: int = 1024  # Megatron's --make-vocab-size-divisible-by: 50257 -> 51200
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int = 4  # grouped-query attention: n_heads // n_kv_heads queries share a K/V head
    ffn_hidden: int = 3072  # intermediate size of one full expert (4H in the paper)
    max_seq_len: int = 1024
    attn_head_dim: int | None = None  # None: d_model // n_heads (imported HF models may set it)
    qk_norm: str = "none"  # none | head (RMSNorm per head: Qwen3) | full (over the projection: OLMoE)
    rope_base: float = 1e6
    norm_eps: float = 1e-5
    init_std: float = 0.01
    scaled_out_init: bool = True  # wo and w2 use init_std / sqrt(2 L) (Megatron's default)

    # --- experts ---
    moe_mode: str = "pool"  # layerwise | pool | grouped
    num_experts: int = 96  # experts per pool (router width); pool: M, layerwise: E per layer
    n_groups: int = 1  # grouped mode only: number of pools, each shared by n_layers // n_groups layers
    top_k: int = 1
    granularity: int = 1  # fine-grained experts: g experts of ffn_hidden / g per original expert

    # --- cross-layer designs beside UniPool (off by default; docs/design.md, "The sharing family") ---
    # Width of an always-on per-layer SwiGLU FFN beside the routed experts (CS-MoE's and GMoE's private
    # "independent" expert): its output is added with weight 1. 0: none.
    private_hidden: int = 0
    # A learnable per-layer vector added to the routed experts' input, not the router's (MoRE's depth
    # embedding): "none" | "zeros" (starts as the model without it) | "normal" (N(0, init_std)).
    depth_embedding: str = "none"
    # Routers restricted to the experts of r adjacent layers (ReXMoE): the pool's experts are split into
    # layers_per_pool equal blocks, block j "belongs" to the pool's j-th layer, and layer l may pick the
    # blocks of the r layers nearest to it. 0: the whole pool (UniPool).
    router_window: int = 0
    # Fraction of training over which a router's candidates grow, nearest experts first, from its own
    # block to the whole window (ReXMoE's progressive scaling routing; the linear schedule is ours).
    # 0: the whole window from the first step.
    router_window_warmup: float = 0.0
    # Each router may pick only the experts that its mask, stored with the weights, allows (a pool merged
    # from a per-layer MoE by `unipool convert --experts M`: each layer routes to the merged experts that
    # hold its own). Never changed by training. False: no stored masks.
    stored_router_masks: bool = False

    # --- router ---
    router: str = "norm"  # softmax | norm (NormRouter) | sigmoid (aux-loss-free bias) | random
    # renormalise the selected gates to sum to 1 (softmax; a sigmoid router renormalises for k > 1 whatever
    # this says, as the official code does, and never for k = 1)
    renormalize: bool = False
    # softmax/sigmoid: the picked gates times this factor (DeepSeek-V3's routed_scaling_factor); 1.0: the gates
    # as they are. "match_gate:<g>" (softmax, ours): the factor that makes the mean sum of picked gates at
    # initialisation g, e.g. a NormRouter's (see router.routed_scaling_value)
    routed_scaling_factor: float | str = 1.0
    # "monte_carlo" (paper) | "one" | a number | "match_gate:<g>" (c such that the mean sum of picked
    # gates at initialisation is g; see router.norm_router_c_value)
    norm_router_c: str | float = "monte_carlo"
    norm_router_eps: float = 1e-8
    # NormRouter sigma: "linear" (paper: sigma is the parameter, nothing keeps it >= 0), or
    # "softplus" / "exp" of a parameter (always > 0; starts at sigma = 1)
    norm_router_scale: str = "linear"
    random_gates: str = "uniform"  # router="random": "uniform" (1/k) or "model" (learned scores)
    aux_free_bias_rate: float = 1e-3  # sigmoid router: per-step bias update rate

    # --- balancing losses ---
    switch_loss_coef: float = 0.0  # per-layer Switch loss alpha (vanilla: 1e-2)
    # E of the Switch loss E * sum_i f_i P_i under a router window or stored masks: "pool" (every expert of
    # the pool, as the studies ran it: at an even load over the C candidates the loss is alpha * E / C) or
    # "candidates" (ours: the C experts the router may pick now, so an even load over them gives alpha)
    switch_loss_width: str = "pool"
    pool_loss_coef: float = 1e-2  # pool-level loss alpha_pool (UniPool: 1e-2 at 182M, 2e-2 larger)
    pool_loss_stats: str = "previous"  # f-bar from the previous micro-batch (paper) or "current"
    z_loss_coef: float = 0.0
    # P of the Switch and pool losses: "raw" mean scores (paper) or "normalized" (each token's scores
    # divided by their sum, so an all-zero NormRouter row no longer lowers the loss)
    balance_scores: str = "raw"
    count_dead_picks: bool = True  # picks whose gate is exactly 0 count as load in f (paper: yes)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_multiple
        return int(math.ceil(self.vocab_size / m) * m)

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.d_model // self.n_heads

    @property
    def n_pools(self) -> int:
        return {"layerwise": self.n_layers, "pool": 1, "grouped": self.n_groups}[self.moe_mode]

    @property
    def layers_per_pool(self) -> int:
        return self.n_layers // self.n_pools

    def pool_of_layer(self, layer: int) -> int:
        return layer // self.layers_per_pool

    @property
    def n_routed_experts(self) -> int:
        """Experts per pool after the fine-grained split."""
        return self.num_experts * self.granularity

    @property
    def routed_top_k(self) -> int:
        return self.top_k * self.granularity

    @property
    def expert_hidden(self) -> int:
        return self.ffn_hidden // self.granularity

    @property
    def experts_per_block(self) -> int:
        """With a router window: the experts of the pool that belong to one of its layers."""
        return self.n_routed_experts // self.layers_per_pool

    @property
    def router_width(self) -> int:
        """Experts a router may pick once training is done: the pool, or its window's blocks."""
        return self.router_window * self.experts_per_block if self.router_window else self.n_routed_experts

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"model.{name}: {msg} (got {getattr(self, name)!r})")

        check_types_and_finite(self, "model")
        for name in ("vocab_size", "vocab_multiple", "d_model", "n_layers", "n_heads", "n_kv_heads",
                     "ffn_hidden", "max_seq_len", "num_experts", "top_k", "granularity", "n_groups"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name,
                 "must be a positive integer")
        need(self.moe_mode in MOE_MODES, "moe_mode", f"must be one of {MOE_MODES}")
        need(self.router in ROUTERS, "router", f"must be one of {ROUTERS}")
        need(self.pool_loss_stats in POOL_LOSS_STATS, "pool_loss_stats", f"must be one of {POOL_LOSS_STATS}")
        need(self.random_gates in ("uniform", "model"), "random_gates", "must be 'uniform' or 'model'")
        if self.attn_head_dim is None:
            need(self.d_model % self.n_heads == 0, "n_heads", f"must divide d_model={self.d_model}")
        else:
            need(isinstance(self.attn_head_dim, int) and self.attn_head_dim > 0, "attn_head_dim",
                 "must be a positive integer or null")
        need(self.qk_norm in ("none", "head", "full"), "qk_norm", "must be 'none', 'head' or 'full'")
        need(self.head_dim % 2 == 0, "n_heads", "must leave an even head_dim for RoPE")
        need(self.n_heads % self.n_kv_heads == 0, "n_kv_heads", f"must divide n_heads={self.n_heads}")
        need(self.ffn_hidden % self.granularity == 0, "granularity", f"must divide ffn_hidden={self.ffn_hidden}")
        need(self.top_k <= self.num_experts, "top_k", f"must be <= num_experts={self.num_experts}")
        # sanity bounds, far above any model here: a meta.json declaring more is refused in one line before
        # the RoPE tables or NormRouter's Monte Carlo constant are computed for it
        need(self.max_seq_len <= 2**24, "max_seq_len", "must be <= 2^24")
        need(self.num_experts * self.granularity <= 2**16, "num_experts", "must give <= 2^16 routed experts per pool")
        if self.moe_mode == "grouped":
            need(self.n_layers % self.n_groups == 0, "n_groups", f"must divide n_layers={self.n_layers}")
        # Fields another setting makes meaningless are refused rather than ignored: a run that asked for
        # them would otherwise train something else than it says.
        need(self.n_groups == 1 or self.moe_mode == "grouped", "n_groups",
             f"applies to moe_mode grouped (moe_mode {self.moe_mode} has "
             f"{'one pool' if self.moe_mode == 'pool' else 'a pool per layer'})")
        need(not self.renormalize or self.router in ("softmax", "sigmoid"), "renormalize",
             f"applies to softmax and sigmoid routers, not {self.router!r}")
        need(self.random_gates == "uniform" or self.router == "random", "random_gates",
             f"applies to random routing (router: random), not {self.router!r}")
        need(isinstance(self.private_hidden, int) and self.private_hidden >= 0, "private_hidden",
             "must be a non-negative integer (0: no private expert)")
        need(self.depth_embedding in DEPTH_EMBEDDINGS, "depth_embedding", f"must be one of {DEPTH_EMBEDDINGS}")
        need(isinstance(self.router_window, int) and self.router_window >= 0, "router_window",
             "must be a non-negative integer (0: the whole pool)")
        need(0.0 <= self.router_window_warmup <= 1.0, "router_window_warmup", "must be in [0, 1]")
        need(self.router_window_warmup == 0 or self.router_window, "router_window_warmup",
             "needs a router_window (it grows the window)")
        need(isinstance(self.stored_router_masks, bool), "stored_router_masks", "must be true or false")
        need(self.switch_loss_width in SWITCH_LOSS_WIDTHS, "switch_loss_width", f"must be one of {SWITCH_LOSS_WIDTHS}")
        need(self.switch_loss_width == "pool" or bool(self.router_window) or self.stored_router_masks,
             "switch_loss_width", "'candidates' applies to a router window or stored masks (without them every "
             "expert is a candidate)")
        if self.stored_router_masks:
            need(not self.router_window, "stored_router_masks", "and a router window exclude each other")
            need(self.router != "random", "stored_router_masks", "has no meaning for random routing")
        if self.router_window:
            need(self.layers_per_pool > 1, "router_window", "needs experts shared across layers (moe_mode pool "
                 "or grouped)")
            need(self.router_window <= self.layers_per_pool, "router_window",
                 f"must be <= the layers sharing a pool ({self.layers_per_pool})")
            need(self.n_routed_experts % self.layers_per_pool == 0, "router_window",
                 f"needs the pool's {self.n_routed_experts} experts to split evenly over its "
                 f"{self.layers_per_pool} layers")
            need(self.router != "random", "router_window", "has no meaning for random routing")
            need(self.routed_top_k <= self.experts_per_block, "router_window",
                 f"needs top_k <= the experts of one layer's block ({self.experts_per_block}), which is all a "
                 "router may pick at the start")
        need(self.rope_base > 0, "rope_base", "must be positive")
        need(self.init_std > 0, "init_std", "must be positive")
        need(self.norm_eps > 0, "norm_eps", "must be positive")
        need(self.norm_router_eps > 0, "norm_router_eps", "must be positive")
        for name in ("switch_loss_coef", "pool_loss_coef", "z_loss_coef", "aux_free_bias_rate"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        if self.router == "random" and self.random_gates == "uniform":
            # Nothing reads such a router's scores, but a balance loss on them would still send gradients
            # into the hidden states (the router reads them): a regulariser toward an unused router's balance.
            for name in ("switch_loss_coef", "pool_loss_coef", "z_loss_coef"):
                need(getattr(self, name) == 0, name, "must be 0 for random routing with uniform gates (no routing "
                     "decision reads the router's scores; its loss would only pull the hidden states)")
        c = self.norm_router_c
        need(c in ("monte_carlo", "one") or _positive_number(c) or
             (isinstance(c, str) and c.startswith("match_gate:") and _positive_number(c[len("match_gate:"):])),
             "norm_router_c", "must be 'monte_carlo', 'one', a positive number or 'match_gate:<g>' with g > 0")
        need(self.norm_router_scale in NORM_ROUTER_SCALES, "norm_router_scale", f"must be one of {NORM_ROUTER_SCALES}")
        need(self.balance_scores in BALANCE_SCORES, "balance_scores", f"must be one of {BALANCE_SCORES}")
        need(isinstance(self.count_dead_picks, bool), "count_dead_picks", "must be true or false")
        s = self.routed_scaling_factor
        match = isinstance(s, str) and s.startswith("match_gate:")
        need((not isinstance(s, str) and _positive_number(s)) or (match and _positive_number(s[len("match_gate:"):])),
             "routed_scaling_factor", "must be a positive number or 'match_gate:<g>' with g > 0")
        need(s == 1.0 or self.router in ("softmax", "sigmoid"), "routed_scaling_factor",
             "applies to softmax and sigmoid routers (NormRouter's gate size is norm_router_c)")
        need(not match or self.router == "softmax", "routed_scaling_factor",
             "'match_gate:<g>' is computed for softmax routers; give a sigmoid router a number")

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"model: expected a mapping of fields, got {type(d).__name__}")
        d = {k: v for k, v in d.items() if k not in LEGACY_EXEC_FIELDS}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"model: unknown field(s) {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
