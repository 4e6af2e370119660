"""`unipool presets`: every preset with its total and active parameters, default data and steps, and the
hardware it is meant for (the README's preset table is this command's output)."""

from __future__ import annotations

import argparse
import json

from unipool.config import preset_config
from unipool.model.model import build_model
from unipool.presets import PRESETS


def preset_rows() -> list[dict]:
    rows = []
    for name, preset in PRESETS.items():
        run = preset_config(name)
        cfg, tc, data = run.model, run.train, run.data
        counts = build_model(cfg, "meta").param_counts()
        experts = (f"{cfg.n_routed_experts} x {cfg.n_layers}" if cfg.moe_mode == "layerwise" else
                   f"{cfg.n_pools} x {cfg.n_routed_experts}" if cfg.n_pools > 1 else f"{cfg.n_routed_experts}")
        rows.append({
            "name": name, "mode": cfg.moe_mode, "layers": cfg.n_layers, "d_model": cfg.d_model,
            "experts": experts, "top_k": cfg.routed_top_k, "total": counts["total"], "active": counts["active"],
            "steps": tc.steps if tc.steps > 0 else None, "tokens": tc.tokens if tc.steps <= 0 else None,
            "tokens_per_step": tc.batch_size * tc.seq_len * tc.grad_accum,
            "data": f"{', '.join(data.sources) or 'Shakespeare'}, {data.tokenizer}", "meant_for": preset.meant_for,
        })
    return rows


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def markdown(rows: list[dict]) -> str:
    lines = ["| preset | mode | layers x d | experts | total | active | default steps x tokens | default data | "
             "meant for |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        steps = f"{r['steps']:,} x {r['tokens_per_step']:,}" if r["steps"] else f"{r['tokens']:,} tokens"
        lines.append(f"| {r['name']} | {r['mode']} | {r['layers']} x {r['d_model']} | {r['experts']} top-{r['top_k']} "
                     f"| {_count(r['total'])} | {_count(r['active'])} | {steps} | {r['data']} | {r['meant_for']} |")
    return "\n".join(lines)


def add_presets_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")


def cmd_presets(args: argparse.Namespace) -> int:
    rows = preset_rows()
    print(json.dumps(rows, indent=2) if args.json else markdown(rows))
    if not args.json:
        print("\nexperts: E x L private experts per layer (layerwise), M in one pool, or G x M in G pools. "
              "A paper preset's 10,000 default steps are a placeholder: set --train.steps or --train.tokens "
              "and --data.sources for a real run.")
    return 0
