"""Parameter accounting of a model config, built on the meta device (the `unipool params` command:
unipool/analysis/params.py)."""

from __future__ import annotations

from unipool.model.config import ModelConfig
from unipool.model.model import build_model


def param_report(cfg: ModelConfig) -> dict:
    counts = build_model(cfg, "meta").param_counts()
    # The matched vanilla model: 8 experts per layer, top-1, each as wide as one routed expert plus the
    # private expert if the model has one (so a pool with a private expert is compared with the vanilla
    # model of the same active FFN width). The budget counts private experts as expert parameters.
    matched = cfg.replace(moe_mode="layerwise", n_groups=1, num_experts=8, router="softmax", granularity=1,
                          top_k=1, switch_loss_coef=1e-2, pool_loss_coef=0.0,
                          ffn_hidden=cfg.ffn_hidden + cfg.private_hidden, private_hidden=0,
                          depth_embedding="none", router_window=0, router_window_warmup=0.0,
                          norm_router_c="monte_carlo", norm_router_scale="linear", norm_router_eps=1e-8,
                          random_gates="uniform", stored_router_masks=False)
    matched_experts = build_model(matched, "meta").param_counts()["experts"]
    return {
        **counts,
        "moe_mode": cfg.moe_mode,
        "n_pools": cfg.n_pools,
        "experts_per_pool": cfg.n_routed_experts,
        "top_k": cfg.routed_top_k,
        "expert_budget_vs_matched_vanilla": (counts["experts"] + counts["private_experts"]) / matched_experts,
    }
