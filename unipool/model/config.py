"""Model configuration: one dataclass, validated at construction, plus named presets.

Expert storage is described by three numbers that cover every mode:

    n_pools      how many expert pools exist (layerwise: L, pool: 1, grouped: G)
    num_experts  experts in each pool = the width of every router (E, M, or M per group)
    layer -> pool: layer l uses pool l // (n_layers // n_pools)

so vanilla MoE ("layerwise"), UniPool ("pool") and grouped sharing ("grouped") are one code path.
Fine-grained experts (granularity g) split every expert into g experts of ffn_hidden // g and route
top_k * g of num_experts * g, which keeps active FLOPs and parameters fixed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from unipool.errors import UnipoolError

MOE_MODES = ("layerwise", "pool", "grouped")
ROUTERS = ("softmax", "norm", "sigmoid", "random")
POOL_LOSS_STATS = ("previous", "current")
DISPATCH = ("auto", "grouped_mm", "loop")


class ConfigError(UnipoolError, ValueError):
    """A configuration value is invalid; the message names the field."""


@dataclass
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

    # --- router ---
    router: str = "norm"  # softmax | norm (NormRouter) | sigmoid (aux-loss-free bias) | random
    renormalize: bool = False  # renormalise the selected gates to sum to 1 (softmax/sigmoid)
    norm_router_c: str | float = "monte_carlo"  # "monte_carlo" | "one" | a number
    norm_router_eps: float = 1e-8
    random_gates: str = "uniform"  # router="random": "uniform" (1/k) or "model" (learned scores)
    aux_free_bias_rate: float = 1e-3  # sigmoid router: per-step bias update rate

    # --- balancing losses ---
    switch_loss_coef: float = 0.0  # per-layer Switch loss alpha (vanilla: 1e-2)
    pool_loss_coef: float = 1e-2  # pool-level loss alpha_pool (UniPool: 1e-2 at 182M, 2e-2 larger)
    pool_loss_stats: str = "previous"  # f-bar from the previous micro-batch (paper) or "current"
    z_loss_coef: float = 0.0

    # --- execution ---
    dispatch: str = "auto"  # auto | grouped_mm | loop
    fused_pool_wgrad: bool = False  # defer expert weight gradients of all layers to one GEMM

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
    def total_experts(self) -> int:
        """Full-size experts stored across all pools (the expert budget, in units of one FFN)."""
        return self.n_pools * self.num_experts

    @property
    def expert_budget(self) -> float:
        """Stored expert FFNs as a fraction of the matched vanilla model (8 experts per layer)."""
        return self.total_experts / (8 * self.n_layers)

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"model.{name}: {msg} (got {getattr(self, name)!r})")

        for name in ("vocab_size", "vocab_multiple", "d_model", "n_layers", "n_heads", "n_kv_heads",
                     "ffn_hidden", "max_seq_len", "num_experts", "top_k", "granularity", "n_groups"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name,
                 "must be a positive integer")
        need(self.moe_mode in MOE_MODES, "moe_mode", f"must be one of {MOE_MODES}")
        need(self.router in ROUTERS, "router", f"must be one of {ROUTERS}")
        need(self.pool_loss_stats in POOL_LOSS_STATS, "pool_loss_stats", f"must be one of {POOL_LOSS_STATS}")
        need(self.dispatch in DISPATCH, "dispatch", f"must be one of {DISPATCH}")
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
        if self.moe_mode == "grouped":
            need(self.n_layers % self.n_groups == 0, "n_groups", f"must divide n_layers={self.n_layers}")
        need(self.rope_base > 0, "rope_base", "must be positive")
        need(self.init_std > 0, "init_std", "must be positive")
        for name in ("switch_loss_coef", "pool_loss_coef", "z_loss_coef", "aux_free_bias_rate"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        c = self.norm_router_c
        need(c in ("monte_carlo", "one") or (isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0),
             "norm_router_c", "must be 'monte_carlo', 'one' or a positive number")

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"model: unknown field(s) {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# ------------------------------------------------------------------------------------------------
# Presets. The paper's five scales (Tables 6 and 8): 8 experts per layer for vanilla, M = 8L for
# UniPool, top-1, 4H full-width SwiGLU experts, GPT-2 vocab padded to 51200, RoPE base 1e6.
# ------------------------------------------------------------------------------------------------

# name: (n_layers, d_model, n_heads, reduced pool sizes M tested in the paper, pool loss alpha)
PAPER_SCALES: dict[str, tuple[int, int, int, tuple[int, ...], float]] = {
    "182m": (12, 768, 12, (64, 48), 1e-2),
    "469m": (24, 1024, 16, (128, 96, 64), 2e-2),
    "650m": (36, 1024, 16, (144, 128, 96), 2e-2),
    "830m": (48, 1024, 16, (160, 128), 2e-2),
    "978m": (24, 1536, 16, (), 2e-2),
}


def _paper(n_layers: int, d_model: int, n_heads: int, **kw: Any) -> ModelConfig:
    return ModelConfig(vocab_size=50257, vocab_multiple=1024, d_model=d_model, n_layers=n_layers,
                       n_heads=n_heads, n_kv_heads=4, ffn_hidden=4 * d_model, max_seq_len=1024, **kw)


def vanilla(n_layers: int, d_model: int, n_heads: int, **kw: Any) -> ModelConfig:
    """Per-layer MoE baseline: 8 private experts per layer, softmax top-1, Switch loss 1e-2."""
    kw = {"moe_mode": "layerwise", "num_experts": 8, "router": "softmax", "switch_loss_coef": 1e-2,
          "pool_loss_coef": 0.0, **kw}
    return _paper(n_layers, d_model, n_heads, **kw)


def unipool(n_layers: int, d_model: int, n_heads: int, pool_loss_coef: float, **kw: Any) -> ModelConfig:
    """UniPool: one pool of M = 8L experts (unless given), NormRouter, pool-level loss."""
    kw = {"moe_mode": "pool", "num_experts": 8 * n_layers, "router": "norm", "switch_loss_coef": 0.0,
          "pool_loss_coef": pool_loss_coef, **kw}
    return _paper(n_layers, d_model, n_heads, **kw)


def _build_presets() -> dict[str, ModelConfig]:
    presets: dict[str, ModelConfig] = {}
    for scale, (n_layers, d_model, n_heads, reduced, alpha) in PAPER_SCALES.items():
        presets[f"vanilla-{scale}"] = vanilla(n_layers, d_model, n_heads)
        presets[f"unipool-{scale}"] = unipool(n_layers, d_model, n_heads, alpha)
        for m in reduced:
            presets[f"unipool-{scale}-m{m}"] = unipool(n_layers, d_model, n_heads, alpha, num_experts=m)
    # Sharing-scope ablation at 182M (Table 5): G pools of 8 * (12 / G) experts each (the paper
    # does not state the group pool size; this keeps the expert budget matched).
    for g in (2, 4, 6):
        presets[f"unipool-182m-g{g}"] = unipool(12, 768, 12, 1e-2, moe_mode="grouped", n_groups=g,
                                                num_experts=8 * 12 // g)

    # Small CPU presets. debug: a forward+backward in milliseconds. demo: trains in minutes on 2 cores.
    small = dict(vocab_size=512, vocab_multiple=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                 ffn_hidden=128, max_seq_len=128, rope_base=1e4, init_std=0.02)
    presets["debug"] = ModelConfig(**small, moe_mode="pool", num_experts=8, router="norm", pool_loss_coef=1e-2)
    presets["debug-vanilla"] = ModelConfig(**small, moe_mode="layerwise", num_experts=4, router="softmax",
                                           switch_loss_coef=1e-2, pool_loss_coef=0.0)
    demo = dict(vocab_size=8192, vocab_multiple=64, d_model=256, n_layers=6, n_heads=4, n_kv_heads=2,
                ffn_hidden=512, max_seq_len=256, rope_base=1e4, init_std=0.02)
    presets["demo"] = ModelConfig(**demo, moe_mode="pool", num_experts=48, router="norm", pool_loss_coef=1e-2)
    presets["demo-vanilla"] = ModelConfig(**demo, moe_mode="layerwise", num_experts=8, router="softmax",
                                          switch_loss_coef=1e-2, pool_loss_coef=0.0)
    return presets


PRESETS: dict[str, ModelConfig] = _build_presets()


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
