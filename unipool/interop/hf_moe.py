"""Hugging Face MoE families as the routing probe sees them: where the routers are, how gates are made.

Shape suffixes: T tokens, E routed experts of a layer, K experts per token.

In transformers 5.x the MoE block of every family in `HF_FAMILIES` has the same interface: the router
`mlp.gate` returns (router_logits_TE, weights_TK, expert_ids_TK), and
`mlp.experts(hidden, expert_ids_TK, weights_TK)` consumes the last two. So one forward hook on
`mlp.gate` can replace a layer's choice for all six families, and no modeling code is copied.
What differs between families is only how logits become gates, which `GateRule` records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from unipool.errors import UnipoolError, json_object, require


class HFMoEError(UnipoolError):
    """An HF checkpoint cannot be loaded, or its model type is not a supported MoE family."""


@dataclass(frozen=True)
class GateRule:
    """How a family turns router logits into the gates of its picked experts."""
    score: str  # "softmax" | "sigmoid"
    renormalize: bool | str  # a constant, or the router attribute that holds the flag
    scale_attr: str | None = None  # router attribute holding the routed scaling factor
    shared_experts: bool = False
    group_limited: bool = False


HF_FAMILIES: dict[str, GateRule] = {
    "mixtral": GateRule("softmax", True),
    "olmoe": GateRule("softmax", "norm_topk_prob"),
    "qwen2_moe": GateRule("softmax", "norm_topk_prob", shared_experts=True),
    "qwen3_moe": GateRule("softmax", "norm_topk_prob"),
    # DeepSeek-V2's router never renormalises (its config flag is unused by transformers).
    "deepseek_v2": GateRule("softmax", False, "routed_scaling_factor", shared_experts=True, group_limited=True),
    "deepseek_v3": GateRule("sigmoid", "norm_topk_prob", "routed_scaling_factor", shared_experts=True,
                            group_limited=True),
}


def check_family(model_type: str | None, where: str = "") -> GateRule:
    if model_type not in HF_FAMILIES:
        raise HFMoEError(f"{where}model type {model_type!r} is not supported by the probe; "
                         f"supported: {', '.join(HF_FAMILIES)}")
    return HF_FAMILIES[model_type]


def moe_blocks(model: nn.Module) -> dict[int, nn.Module]:
    """Decoder layer index -> MoE block (`mlp` with a `gate` and `experts`) of a model of `HF_FAMILIES`;
    dense layers are left out."""
    layers = model.get_decoder().layers
    return {i: layer.mlp for i, layer in enumerate(layers)
            if hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts")}


def hf_random_gates(rule: GateRule, router: nn.Module, logits_TE: torch.Tensor, ids_TK: torch.Tensor,
                    gates: str) -> torch.Tensor:
    """Gates for the experts `ids_TK` picked at random, computed as the family computes gates:
    "uniform" = scale / k; "model" = the family's scores at the picks, renormalised if it
    renormalises, times scale (the routed scaling factor, 1 for most families)."""
    scale = float(getattr(router, rule.scale_attr)) if rule.scale_attr else 1.0
    if gates == "uniform":
        return torch.full(ids_TK.shape, scale / ids_TK.shape[1], device=ids_TK.device)
    logits_TE = logits_TE.float().reshape(ids_TK.shape[0], -1)
    scores_TE = logits_TE.softmax(-1) if rule.score == "softmax" else logits_TE.sigmoid()
    weights_TK = scores_TE.gather(1, ids_TK)
    renorm = rule.renormalize if isinstance(rule.renormalize, bool) else bool(getattr(router, rule.renormalize))
    if renorm:
        weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
    return weights_TK * scale


def family_notes(rule: GateRule, router: nn.Module) -> list[str]:
    """What random routing leaves out for this family (printed in the probe report)."""
    notes = []
    if rule.shared_experts:
        notes.append("shared experts keep running; only the routed experts are randomised")
    limited = getattr(router, "topk_method", "group_limited_greedy") == "group_limited_greedy" and \
        getattr(router, "topk_group", 1) < getattr(router, "num_group", 1)
    if rule.group_limited and limited:
        notes.append("random experts are drawn over all routed experts (the group limit is not applied)")
    return notes


def checkpoint_model_type(path: Path) -> str | None:
    """The `model_type` of an HF checkpoint directory, or None if `path` is not one."""
    config = path / "config.json" if path.is_dir() else None
    if config is None or not config.is_file():
        return None
    try:
        raw = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise HFMoEError(f"{config} is not valid JSON: {e}") from None
    return json_object(raw, config, HFMoEError).get("model_type")


def load_checkpoint(path: Path, device: str, dtype: str = "auto"):
    """(model, tokenizer) of a local HF MoE checkpoint, in eval mode, for scoring.

    `dtype` is "auto" (the checkpoint's) or a torch dtype name. Never uses trust_remote_code."""
    check_family(checkpoint_model_type(path), f"{path}: ")
    transformers = require("transformers", "hf", "a Hugging Face model")
    AutoModelForCausalLM, AutoTokenizer = transformers.AutoModelForCausalLM, transformers.AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype if dtype == "auto" else getattr(torch, dtype), device_map=device)
    except (OSError, ValueError) as e:
        raise HFMoEError(f"cannot load {path} with transformers: {str(e).splitlines()[0]}") from None
    model.eval()
    model.config.use_cache = False  # scoring only: no KV cache to allocate per forward
    return model, tokenizer


__all__ = ["HF_FAMILIES", "GateRule", "HFMoEError", "check_family", "checkpoint_model_type", "family_notes",
           "hf_random_gates", "load_checkpoint", "moe_blocks"]
