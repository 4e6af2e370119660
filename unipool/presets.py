"""Named presets: each is a model and the training recipe that goes with it, in one table.

    get_preset(name)   the ModelConfig (what `from unipool import get_preset` has always returned)
    PRESETS[name]      Preset(model, recipe): recipe = the TrainConfig fields that differ from the
                       defaults (which are the paper's recipe, Table 8)

The paper's five scales (Tables 6 and 8): 8 experts per layer for vanilla, M = 8L for UniPool, top-1,
4H full-width SwiGLU experts, GPT-2 vocab padded to 51200, RoPE base 1e6; plus the reduced pools and
grouped-sharing ablations, the fine-grained rows (full-width experts, `*-182m-e16k2`, `*-182m-e32k4`),
and two small CPU presets with short recipes (the paper's recipe would
barely start in minutes on a CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from unipool.model.config import ConfigError, ModelConfig

DEFAULT_PRESET = "demo"


@dataclass(frozen=True)
class Preset:
    model: ModelConfig
    recipe: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields that differ from the defaults
    data: dict[str, Any] = field(default_factory=dict)  # DataConfig fields that differ from the defaults
    meant_for: str = "GPUs (a paper scale)"  # the hardware it is sized for (`unipool presets`)


# name: (n_layers, d_model, n_heads, reduced pool sizes M tested in the paper, pool loss alpha)
PAPER_SCALES: dict[str, tuple[int, int, int, tuple[int, ...], float]] = {
    "182m": (12, 768, 12, (64, 48), 1e-2),
    "469m": (24, 1024, 16, (128, 96, 64), 2e-2),
    "650m": (36, 1024, 16, (144, 128, 96), 2e-2),
    "830m": (48, 1024, 16, (160, 128), 2e-2),
    "978m": (24, 1536, 16, (), 2e-2),
}
# The paper trains each scale on its own token budget; without one given, a paper preset runs this many
# steps of the default recipe (set train.steps or train.tokens for a real run).
PAPER_RECIPE: dict[str, Any] = {"steps": 10_000}
# The 182M fine-grained sweep: (experts per layer, top-k), full-width experts.
PAPER_FINE_GRAINED: tuple[tuple[int, int], ...] = ((16, 2), (32, 4))


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


def _build_presets() -> dict[str, Preset]:
    presets: dict[str, Preset] = {}
    for scale, (n_layers, d_model, n_heads, reduced, alpha) in PAPER_SCALES.items():
        presets[f"vanilla-{scale}"] = Preset(vanilla(n_layers, d_model, n_heads), PAPER_RECIPE)
        presets[f"unipool-{scale}"] = Preset(unipool(n_layers, d_model, n_heads, alpha), PAPER_RECIPE)
        for m in reduced:
            presets[f"unipool-{scale}-m{m}"] = Preset(unipool(n_layers, d_model, n_heads, alpha, num_experts=m),
                                                      PAPER_RECIPE)
    # Sharing-scope ablation at 182M (Table 5): G pools of 8 * (12 / G) experts each (the paper does
    # not state the group pool size; this keeps the expert budget matched).
    for g in (2, 4, 6):
        presets[f"unipool-182m-g{g}"] = Preset(unipool(12, 768, 12, 1e-2, moe_mode="grouped", n_groups=g,
                                                       num_experts=8 * 12 // g), PAPER_RECIPE)
    # Fine-grained rows at 182M (Fig. 2b, Table 3) as the paper ran them: full-width (4H) experts, 16
    # per layer top-2 and 32 top-4, so active parameters grow (~268M and ~438M); UniPool pools 16L and
    # 32L. `granularity` is another experiment: it splits experts and keeps active parameters fixed.
    for n_experts, top_k in PAPER_FINE_GRAINED:
        tag = f"182m-e{n_experts}k{top_k}"
        presets[f"vanilla-{tag}"] = Preset(vanilla(12, 768, 12, num_experts=n_experts, top_k=top_k), PAPER_RECIPE)
        presets[f"unipool-{tag}"] = Preset(unipool(12, 768, 12, 1e-2, num_experts=n_experts * 12, top_k=top_k),
                                           PAPER_RECIPE)

    # debug: a forward+backward in milliseconds, 20 steps.
    small = {"vocab_size": 512, "vocab_multiple": 64, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
             "ffn_hidden": 128, "max_seq_len": 128, "rope_base": 1e4, "init_std": 0.02}
    debug = {"steps": 20, "batch_size": 8, "seq_len": 64, "lr": 3e-3, "min_lr": 3e-4, "warmup_frac": 0.1,
             "eval_interval": 10, "eval_tokens": 4096, "log_interval": 5, "routing_interval": 10,
             "ckpt_interval": 10, "sample_tokens": 8, "precision": "fp32"}
    presets["debug"] = Preset(ModelConfig(**small, moe_mode="pool", num_experts=8, router="norm",
                                          pool_loss_coef=1e-2), debug, meant_for="CPU, seconds (tests)")
    presets["debug-vanilla"] = Preset(ModelConfig(**small, moe_mode="layerwise", num_experts=4, router="softmax",
                                                  switch_loss_coef=1e-2, pool_loss_coef=0.0), debug,
                                      meant_for="CPU, seconds (tests)")

    # demo: the first run a new user sees, tuned for the best validation loss in at most 4 minutes on 2
    # idle cores, data preparation included (docs/LOG.md, 2026-11-30): a narrow model that sees ~1M
    # tokens in small batches beats a wider one that sees fewer (d=256: 0.86 nats below the unigram
    # baseline in the same time; this: 1.59, val loss 4.65 vs 6.24, 3 min 48 s in all at ~3,500 tok/s).
    # A 4,096-token BPE: the corpus's words fit, and the output layer stays cheap.
    demo_model = {"vocab_size": 4096, "vocab_multiple": 64, "d_model": 128, "n_layers": 6, "n_heads": 4,
                  "n_kv_heads": 2, "ffn_hidden": 512, "max_seq_len": 256, "rope_base": 1e4, "init_std": 0.02}
    demo = {"steps": 720, "batch_size": 8, "seq_len": 128, "lr": 2e-3, "min_lr": 2e-4, "warmup_frac": 0.05,
            "eval_interval": 250, "eval_tokens": 16384, "log_interval": 10, "routing_interval": 100,
            "ckpt_interval": 250, "keep_last": 1, "sample_tokens": 80}
    demo_data = {"tokenizer": "bpe:4096"}
    presets["demo"] = Preset(ModelConfig(**demo_model, moe_mode="pool", num_experts=48, router="norm",
                                         pool_loss_coef=1e-2), demo, demo_data, meant_for="CPU, minutes")
    presets["demo-vanilla"] = Preset(ModelConfig(**demo_model, moe_mode="layerwise", num_experts=8,
                                                 router="softmax", switch_loss_coef=1e-2, pool_loss_coef=0.0),
                                     demo, demo_data, meant_for="CPU, minutes")
    return presets


PRESETS: dict[str, Preset] = _build_presets()


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from: {', '.join(PRESETS)}")
    return PRESETS[name]


def get_preset(name: str) -> ModelConfig:
    """The model of preset `name` (configs are frozen: derive variants with `.replace(...)`)."""
    return preset(name).model
