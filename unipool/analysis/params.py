"""`unipool params`: total / active / expert parameter counts of a preset or a config file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from unipool.model.config import ConfigError, ModelConfig
from unipool.model.params import param_report
from unipool.presets import get_preset


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
            data = json.loads(args.config.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{args.config}: not valid JSON ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("model", data), dict):
            raise ConfigError(f"{args.config}: expected a JSON object of model fields (or a run's config.json)")
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
        *([("private experts (always on)", _human(report["private_experts"]))] if report["private_experts"] else []),
        ("expert budget vs matched vanilla", f"{100 * report['expert_budget_vs_matched_vanilla']:.1f}%"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    return 0
