"""`unipool params`: parameter accounting for a preset or a config file, built on the meta device."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from unipool.model.config import ConfigError, ModelConfig
from unipool.model.model import build_model
from unipool.presets import get_preset


def param_report(cfg: ModelConfig) -> dict:
    counts = build_model(cfg, "meta").param_counts()
    matched = cfg.replace(moe_mode="layerwise", num_experts=8, router="softmax", granularity=1,
                          top_k=1, switch_loss_coef=1e-2, pool_loss_coef=0.0)
    matched_experts = build_model(matched, "meta").param_counts()["experts"]
    return {
        **counts,
        "moe_mode": cfg.moe_mode,
        "n_pools": cfg.n_pools,
        "experts_per_pool": cfg.n_routed_experts,
        "top_k": cfg.routed_top_k,
        "expert_budget_vs_matched_vanilla": counts["experts"] / matched_experts,
    }


def _human(n: float) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def add_params_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="unipool-182m", help="preset name (default: unipool-182m)")
    src.add_argument("--config", type=Path, help="JSON file with model config fields (or a run's config.json)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def cmd_params(args: argparse.Namespace) -> int:
    if args.config is not None:
        if not args.config.is_file():
            raise ConfigError(f"config file not found: {args.config}")
        try:
            data = json.loads(args.config.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{args.config}: not valid JSON ({e})") from None
        cfg = ModelConfig.from_dict(data.get("model", data))
        name = str(args.config)
    else:
        cfg, name = get_preset(args.preset), args.preset
    report = param_report(cfg)
    if args.json:
        print(json.dumps({"name": name, **report}, indent=2))
        return 0
    print(f"{name}: {cfg.moe_mode}, {cfg.n_pools} pool(s) x {cfg.n_routed_experts} experts, top-{cfg.routed_top_k}")
    rows = [
        ("total", _human(report["total"])),
        ("active per token", _human(report["active"])),
        ("dense-equivalent (paper's 'active')", _human(report["dense_equivalent"])),
        ("experts", _human(report["experts"])),
        ("routers", _human(report["routers"])),
        ("expert budget vs matched vanilla", f"{100 * report['expert_budget_vs_matched_vanilla']:.1f}%"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    return 0
