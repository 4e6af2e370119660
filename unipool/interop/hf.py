"""Hugging Face transformers bridge: export a unipool model, import Mixtral / OLMoE / Qwen3-MoE.

Export (`export_hf`, `unipool export RUN --hf DIR`) writes a transformers directory with remote code:
    config.json            model_type "unipool", auto_map -> configuration_unipool / modeling_unipool
    model.safetensors      HF names; each expert pool stored ONCE (model.experts.{p}.gate_up_proj/down_proj);
                           above --max-shard-size: model-0000i-of-0000n.safetensors + model.safetensors.index.json
    configuration_unipool.py, modeling_unipool.py   self-contained copies of unipool/interop/hf_remote/
    tokenizer.json, tokenizer_config.json, generation_config.json
Load it with AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) and AutoTokenizer.from_pretrained(DIR).
The shared pool stays shared: a UniPool export has one pool parameter set that every layer calls.
Weights are written in the dtype they are stored in (an imported bf16 model stays bf16) unless --dtype says otherwise.

Neither direction overwrites without consent: a non-empty target directory needs --force (`force=True`),
and a unipool run or checkpoint directory (the run being exported included) is refused even with it.

Import (`import_hf`, `unipool import HF_DIR --out RUN`) maps a Mixtral, OLMoE or Qwen3-MoE checkpoint onto a
`layerwise` unipool model with identical math, and refuses (naming the feature) anything that does not map:
tied embeddings, shared experts, dense layers mixed in, sliding windows, biases, clip_qkv, RoPE scaling.
The family's router_aux_loss_coef becomes switch_loss_coef = router_aux_loss_coef * top_k / n_layers, the
same balance loss at uniform load (switch_coef_from_hf). It also restores a unipool export exactly
(model_type "unipool", its own config). The run is written outside the source directory, never into it.

Name map (unipool <-> HF), `{i}` a layer and `{p}` a pool:
    tok_embeddings.weight                 model.embed_tokens.weight
    layers.{i}.attention_norm.weight      model.layers.{i}.input_layernorm.weight
    layers.{i}.attention.w{q,k,v,o}       model.layers.{i}.self_attn.{q,k,v,o}_proj
    layers.{i}.attention.{q,k}_norm       model.layers.{i}.self_attn.{q,k}_norm
    layers.{i}.ffn_norm.weight            model.layers.{i}.post_attention_layernorm.weight
    layers.{i}.router.gate.weight         model.layers.{i}.mlp.gate.weight
    layers.{i}.router.candidate_mask_E    model.layers.{i}.mlp.gate.candidate_mask      (router window)
    layers.{i}.private_expert.w13 / w2    model.layers.{i}.mlp.private_expert.gate_up_proj / down_proj
    layers.{i}.depth_embedding            model.layers.{i}.mlp.depth_embedding
    experts.{p}.w13_EFD / w2_EDF          model.experts.{p}.gate_up_proj / down_proj   (export)
                                          model.layers.{i}.mlp.experts.*               (import, per layer)
    norm.weight, output.weight            model.norm.weight, lm_head.weight
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from unipool.config import default_config
from unipool.data.tokenizer import TokenizerError, as_tokenizers, eos_token
from unipool.errors import UnipoolError, read_json_object, require
from unipool.model.config import ModelConfig
from unipool.model.model import Unipool, build_model
from unipool.run import Run
from unipool.weights import DTYPES, load_model, load_state, main_dtype

REMOTE_DIR = Path(__file__).parent / "hf_remote"
REMOTE_FILES = ("configuration_unipool.py", "modeling_unipool.py")
SUPPORTED = ("mixtral", "olmoe", "qwen3_moe", "unipool")


class HFError(UnipoolError):
    """A Hugging Face directory cannot be exported, read or mapped onto a unipool model."""


# (unipool pattern, HF pattern) pairs; `{i}` matches a layer or pool index.
_NAMES = [
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    *[(f"layers.{{i}}.attention.w{x}.weight", f"model.layers.{{i}}.self_attn.{x}_proj.weight") for x in "qkvo"],
    *[(f"layers.{{i}}.attention.{x}_norm.weight", f"model.layers.{{i}}.self_attn.{x}_norm.weight") for x in "qk"],
    ("layers.{i}.router.gate.weight", "model.layers.{i}.mlp.gate.weight"),
    ("layers.{i}.router.scale", "model.layers.{i}.mlp.gate.scale"),
    ("layers.{i}.router.expert_bias", "model.layers.{i}.mlp.gate.expert_bias"),
    ("layers.{i}.router.candidate_mask_E", "model.layers.{i}.mlp.gate.candidate_mask"),
    ("layers.{i}.private_expert.w13.weight", "model.layers.{i}.mlp.private_expert.gate_up_proj.weight"),
    ("layers.{i}.private_expert.w2.weight", "model.layers.{i}.mlp.private_expert.down_proj.weight"),
    ("layers.{i}.depth_embedding", "model.layers.{i}.mlp.depth_embedding"),
    ("experts.{i}.w13_EFD", "model.experts.{i}.gate_up_proj"),
    ("experts.{i}.w2_EDF", "model.experts.{i}.down_proj"),
]
# Training-only buffers of unipool (pool-loss statistics): not part of an export, re-initialised on import.
_TRAINING_BUFFERS = ("pool_load_PE", "pool_load_valid")


def _regex(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(re.escape("{i}"), r"(\d+)") + "$")


_TO_HF = [(_regex(ours), hf) for ours, hf in _NAMES]
_FROM_HF = [(_regex(hf), ours) for ours, hf in _NAMES]


def _rename(key: str, table) -> str | None:
    for rx, target in table:
        m = rx.match(key)
        if m:
            return target.replace("{i}", m.group(1)) if m.groups() else target
    return None


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------

def _norm_router_c(model: Unipool) -> float:
    router = model.layers[0].router
    return float(getattr(router, "norm_c", 1.0))


def check_exportable(cfg) -> None:
    """Refuse, naming the option, a model the exported code (hf_remote/) does not compute."""
    if cfg.router == "norm" and cfg.norm_router_scale != "linear":
        raise HFError(f"cannot export model.norm_router_scale={cfg.norm_router_scale!r}: the exported NormRouter "
                      "uses its scale as sigma directly (the paper's linear parametrisation); only 'linear' exports")


def hf_config_dict(model: Unipool, eos_id: int | None = None) -> dict:
    """config.json of an export: standard transformers names plus unipool's MoE fields."""
    cfg = model.config
    d = {
        "architectures": ["UnipoolForCausalLM"],
        "model_type": "unipool",
        "auto_map": {"AutoConfig": "configuration_unipool.UnipoolConfig",
                     "AutoModelForCausalLM": "modeling_unipool.UnipoolForCausalLM"},
        "vocab_size": cfg.vocab_size,
        "padded_vocab_size": cfg.padded_vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "qk_norm": cfg.qk_norm,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_base": cfg.rope_base,
        "rms_norm_eps": cfg.norm_eps,
        "n_pools": cfg.n_pools,
        "num_experts": cfg.n_routed_experts,
        "num_experts_per_tok": cfg.routed_top_k,
        "expert_hidden": cfg.expert_hidden,
        "router": cfg.router,
        # sigmoid with k > 1 always renormalises its gates (router.weights_at), as the official code does
        "renormalize": cfg.renormalize or (cfg.router == "sigmoid" and cfg.routed_top_k > 1),
        "routed_scaling_factor": float(model.layers[0].router.scaling),  # the number ("match_gate:" resolved)
        "norm_router_c": _norm_router_c(model),
        "norm_router_eps": cfg.norm_router_eps,
        "random_gates": cfg.random_gates,
        "router_masked": bool(cfg.router_window) or cfg.stored_router_masks,  # candidate masks are in the weights
        "private_hidden": cfg.private_hidden,
        "depth_embedding": cfg.depth_embedding != "none",
        "expert_kernel": "auto",
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": False,
        "use_cache": True,
        "unipool": cfg.to_dict(),
    }
    if eos_id is not None:
        d.update(bos_token_id=eos_id, eos_token_id=eos_id)
    return d


def hf_state_dict(model: Unipool) -> dict[str, torch.Tensor]:
    """The model's weights under HF names; each pool appears once."""
    out = {}
    for key, value in model.state_dict().items():
        if key in _TRAINING_BUFFERS:
            continue
        name = _rename(key, _TO_HF)
        if name is None:  # a new parameter in model.py that the export does not know yet
            raise HFError(f"export does not know how to name parameter {key!r}")
        out[name] = value.detach().contiguous().cpu()
    return out


def save_hf_tokenizer(tokenizer, out_dir: str | Path, model_max_length: int) -> int | None:
    """Write tokenizer.json + tokenizer_config.json that AutoTokenizer loads as a PreTrainedTokenizerFast.
    Returns the EOS token id (also used as BOS, GPT-2 style), or None if the tokenizer has none."""
    from transformers import PreTrainedTokenizerFast

    try:
        tok = as_tokenizers(tokenizer)
    except TokenizerError as e:
        raise HFError(str(e)) from None
    eos = eos_token(tok)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos,
                                     model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    hf_tok.save_pretrained(str(out_dir))
    # transformers 5 writes its own class name ("TokenizersBackend"); the 4.x name loads in both versions.
    cfg_path = Path(out_dir) / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    return tok.token_to_id(eos) if eos else None


def parse_size(text: str | int) -> int:
    """Bytes from an int or a size like "5GB", "500MB", "2GiB" (decimal units as in transformers)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise HFError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise HFError(f"shard size must be positive, not {text!r}")
    return size


def save_sharded(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> list[str]:
    """state as model.safetensors, or, above max_shard_bytes, as model-0000i-of-0000n.safetensors shards
    (tensors in order, a tensor never split) with model.safetensors.index.json, as save_pretrained writes
    them. Returns the file names written."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    for stale in [*out.glob("model-*-of-*.safetensors"), out / "model.safetensors", out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # a previous export with another shard count
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(out / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [*names, "model.safetensors.index.json"]


def export_hf(model: Unipool, tokenizer, out_dir: str | Path, dtype: torch.dtype | None = None,
              max_shard_size: str | int = "5GB", force: bool = False) -> Path:
    """Write `model` (and `tokenizer`: a tokenizer.json path, a Tokenizer, or None) as a transformers
    directory loadable with trust_remote_code=True, its floating-point weights in `dtype` (default: the
    model's). Weights above `max_shard_size` are split into shards. Returns out_dir. A non-empty `out_dir`
    needs `force`; a unipool run or checkpoint is refused (see check_target)."""
    out = Path(out_dir)
    check_exportable(model.config)
    check_target(out, force)
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype or model.tok_embeddings.weight.dtype
    eos_id = None
    if tokenizer is not None:
        eos_id = save_hf_tokenizer(tokenizer, out, model.config.max_seq_len)
    else:  # a forced export over an older one must not ship that export's tokenizer
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (out / name).unlink(missing_ok=True)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in hf_state_dict(model).items()}
    save_sharded(state, out, parse_size(max_shard_size))
    config = hf_config_dict(model, eos_id)
    config["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"do_sample": False} if eos_id is None else {"bos_token_id": eos_id, "eos_token_id": eos_id,
                                                        "pad_token_id": eos_id, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    for name in REMOTE_FILES:
        shutil.copyfile(REMOTE_DIR / name, out / name)
    return out


def unipool_dir_kind(path: Path) -> str | None:
    """What unipool directory `path` is ("a unipool run", ...), or None. A transformers directory has a
    config.json too: a run's holds no model_type, or the run has checkpoints/."""
    if not path.is_dir():
        return None
    if (path / "checkpoints").is_dir():
        return "a unipool run"
    if Run.holds_run(path):
        try:
            raw = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            return "a unipool run"  # unreadable: do not guess that it may be replaced
        if not isinstance(raw, dict) or "model_type" not in raw:
            return "a unipool run"
    if (path / "meta.json").is_file():
        return "a unipool checkpoint"
    if path.name == "checkpoints" and Run.holds_run(path.parent):
        return "a unipool run's checkpoints directory"
    return None


def check_target(path: Path, force: bool) -> None:
    """Refuse to write into a unipool run or checkpoint (always: it would stop resuming and evaluating),
    a file, or a non-empty directory (unless `force`, the command line's --force)."""
    kind = unipool_dir_kind(path)
    if kind:
        raise HFError(f"{path} is {kind}; writing into it would break it: choose another directory")
    if path.exists() and not path.is_dir():
        raise HFError(f"{path} is a file, not a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise HFError(f"{path} is not empty; pass --force to write into it")


def check_apart(source: Path, out: Path) -> None:
    """Refuse an output directory that is the source directory, lies inside it or holds it: the run's
    config.json would replace the source's (or mix with its files) while the source is still being read."""
    src, dst = source.resolve(), out.resolve()
    if src == dst or src in dst.parents or dst in src.parents:
        where = "is" if src == dst else "is inside" if src in dst.parents else "holds"
        raise HFError(f"{out} {where} the source directory {source}; write the run to a directory outside it")


def find_run_tokenizer(run: str | Path) -> Path | None:
    """The tokenizer.json of a run (or of the run holding a checkpoint), or None."""
    try:
        return Run.open(run).tokenizer_path()
    except UnipoolError:
        return None


# ------------------------------------------------------------------------------------------------
# Import
# ------------------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    return read_json_object(path, HFError)


def _weight_files(hf_dir: Path) -> list[Path]:
    """model.safetensors, or the shards named by model.safetensors.index.json."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFError(f"{index} has no weight_map")
        return [hf_dir / name for name in sorted(set(weight_map.values()))]
    if (hf_dir / "model.safetensors").is_file():
        return [hf_dir / "model.safetensors"]
    if any(hf_dir.glob("*.bin")):
        raise HFError(f"{hf_dir}: only safetensors checkpoints can be imported (found *.bin)")
    raise HFError(f"{hf_dir}: no model.safetensors")


def _load_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state = {}
    for path in _weight_files(hf_dir):
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError) as e:
            raise HFError(f"corrupt weights {path}: {e}") from None
    return state


def source_dtype(hf_dir: str | Path) -> torch.dtype:
    """The dtype a Hugging Face checkpoint stores its weights in (read from the safetensors headers)."""
    from safetensors import SafetensorError, safe_open

    shapes_dtypes = []
    for path in _weight_files(Path(hf_dir)):
        try:
            with safe_open(str(path), "pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    sl = f.get_slice(key)
                    shapes_dtypes.append(torch.empty(sl.get_shape(), dtype=_SAFETENSORS_DTYPES.get(
                        sl.get_dtype(), torch.uint8), device="meta"))
        except (SafetensorError, OSError) as e:
            raise HFError(f"corrupt weights {path}: {e}") from None
    return main_dtype(shapes_dtypes)


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _check_supported(hf_cfg, model_type: str) -> None:
    """Raise naming every feature of the HF config that a layerwise unipool model cannot express."""
    problems = []
    if getattr(hf_cfg, "tie_word_embeddings", False):
        problems.append("tied input/output embeddings (tie_word_embeddings=true)")
    if getattr(hf_cfg, "hidden_act", "silu") != "silu":
        problems.append(f"activation {hf_cfg.hidden_act!r} (only SwiGLU with silu)")
    # transformers 5 keeps RoPE settings in rope_parameters, 4.x in rope_scaling (type or rope_type)
    rope = getattr(hf_cfg, "rope_parameters", None) or getattr(hf_cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        problems.append(f"RoPE scaling (rope_type={rope_type!r})")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append("partial rotary embeddings")
    if getattr(hf_cfg, "attention_bias", False) or getattr(hf_cfg, "mlp_bias", False):
        problems.append("attention/MLP biases")
    if getattr(hf_cfg, "sliding_window", None) is not None:
        problems.append(f"sliding-window attention (sliding_window={hf_cfg.sliding_window})")
    layer_types = getattr(hf_cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        problems.append("non-full attention layers (layer_types)")
    if getattr(hf_cfg, "clip_qkv", None) is not None:
        problems.append(f"clip_qkv={hf_cfg.clip_qkv}")
    if model_type == "qwen3_moe" and (hf_cfg.decoder_sparse_step != 1 or hf_cfg.mlp_only_layers):
        problems.append("dense MLP layers mixed in (decoder_sparse_step/mlp_only_layers)")
    if model_type == "olmoe":
        head_dim = getattr(hf_cfg, "head_dim", None)
        if head_dim and head_dim * hf_cfg.num_attention_heads != hf_cfg.hidden_size:
            problems.append("OLMoE with head_dim * num_attention_heads != hidden_size")
    if problems:
        raise HFError(f"cannot import this {model_type} model: unsupported " + "; ".join(problems))


def _features_we_lack(raw: dict) -> list[str]:
    """What a config.json of another family describes that a unipool model has no equivalent for. Read
    from the fields themselves, so that a family is refused for what it has, not for its name."""
    found = []
    if not any(raw.get(k) for k in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")):
        found.append("dense FFNs only (no mixture-of-experts layers)")
    shared = {k: raw[k] for k in ("n_shared_experts", "num_shared_experts", "shared_expert_intermediate_size")
              if raw.get(k)}
    if shared:
        found.append("shared experts (" + ", ".join(f"{k}={v}" for k, v in shared.items()) + ")")
    dense = {k: raw[k] for k in ("first_k_dense_replace", "mlp_only_layers") if raw.get(k)}
    dense.update({k: raw[k] for k in ("decoder_sparse_step", "moe_layer_freq") if raw.get(k, 1) not in (1, None)})
    if dense:
        found.append("dense FFN layers between the MoE layers (" + ", ".join(f"{k}={v}" for k, v in dense.items()) + ")")
    mla = {k: raw[k] for k in ("kv_lora_rank", "q_lora_rank") if raw.get(k)}
    if mla:
        found.append("multi-head latent attention (MLA: " + ", ".join(f"{k}={v}" for k, v in mla.items()) + ")")
    if (raw.get("n_group") or 1) > 1:
        found.append(f"group-limited routing (n_group={raw['n_group']}, topk_group={raw.get('topk_group')})")
    if raw.get("routed_scaling_factor") not in (None, 1, 1.0):
        found.append(f"scaled routed outputs (routed_scaling_factor={raw['routed_scaling_factor']})")
    return found


def _unipool_config_from_hf(hf_cfg, model_type: str) -> ModelConfig:
    n_heads = hf_cfg.num_attention_heads
    head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // n_heads
    rope = getattr(hf_cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(hf_cfg, "rope_theta", None))
    if theta is None:
        raise HFError(f"{model_type} config has no rope_theta")
    return ModelConfig(
        vocab_size=hf_cfg.vocab_size, vocab_multiple=1, d_model=hf_cfg.hidden_size,
        n_layers=hf_cfg.num_hidden_layers, n_heads=n_heads, n_kv_heads=hf_cfg.num_key_value_heads or n_heads,
        ffn_hidden=hf_cfg.moe_intermediate_size if model_type == "qwen3_moe" else hf_cfg.intermediate_size,
        max_seq_len=hf_cfg.max_position_embeddings,
        attn_head_dim=head_dim if head_dim * n_heads != hf_cfg.hidden_size else None,
        qk_norm={"mixtral": "none", "olmoe": "full", "qwen3_moe": "head"}[model_type],
        rope_base=float(theta), norm_eps=hf_cfg.rms_norm_eps, init_std=hf_cfg.initializer_range,
        moe_mode="layerwise", num_experts=hf_cfg.num_local_experts if model_type == "mixtral" else hf_cfg.num_experts,
        top_k=hf_cfg.num_experts_per_tok, router="softmax",
        # Mixtral always renormalises the top-k probabilities; OLMoE / Qwen3 only with norm_topk_prob.
        renormalize=True if model_type == "mixtral" else bool(hf_cfg.norm_topk_prob),
        switch_loss_coef=switch_coef_from_hf(hf_cfg.router_aux_loss_coef, hf_cfg.num_experts_per_tok,
                                             hf_cfg.num_hidden_layers),
        pool_loss_coef=0.0,
    )


def switch_coef_from_hf(router_aux_loss_coef: float, top_k: int, n_layers: int) -> float:
    """Our per-layer Switch coefficient that weighs the balance loss as transformers' router_aux_loss_coef
    does. transformers computes one loss over all layers' tokens with f_i not divided by k, which is k at
    uniform load; ours is E * sum_i f_i P_i per layer (f_i divided by k), which is 1 at uniform load, summed
    over the L layers. The two totals are equal at balance when alpha_ours * L = alpha_hf * k."""
    return router_aux_loss_coef * top_k / n_layers


_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(?:(\d+)\.(gate_proj|up_proj|down_proj)\.weight"
                         r"|(gate_up_proj|down_proj))$")
_LEGACY_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _normalise_hf_key(key: str) -> str:
    # Mixtral checkpoints call the MoE block "block_sparse_moe" and its expert matrices w1 / w3 / w2.
    key = key.replace(".block_sparse_moe.", ".mlp.")
    return re.sub(r"(\.experts\.\d+\.)(w[123])\.", lambda m: m.group(1) + _LEGACY_EXPERT_NAMES[m.group(2)] + ".", key)


def _state_from_family(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Per-layer HF experts (per-expert matrices or fused 3-D tensors) -> unipool's layerwise pools."""
    ours: dict[str, torch.Tensor] = {}
    per_expert: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    unknown = []
    for key, value in hf_state.items():
        key = _normalise_hf_key(key)
        m = _EXPERT_KEY.match(key)
        if m:
            layer = int(m.group(1))
            if m.group(4):  # fused (transformers 5): gate_up_proj (E, 2F, D) = w13_EFD, down_proj (E, D, F)
                ours[f"experts.{layer}.{'w13_EFD' if m.group(4) == 'gate_up_proj' else 'w2_EDF'}"] = value
            else:
                per_expert.setdefault((layer, m.group(3)), {})[int(m.group(2))] = value
            continue
        name = _rename(key, _FROM_HF)
        if name is None or name.startswith("experts."):
            unknown.append(key)
        else:
            ours[name] = value
    if unknown:
        raise HFError(f"cannot map {len(unknown)} HF weight(s) onto unipool, e.g. {unknown[:3]} "
                      "(shared experts or biases are not supported)")
    for layer in range(cfg.n_layers):
        parts = {name: per_expert.get((layer, name)) for name in ("gate_proj", "up_proj", "down_proj")}
        if not any(parts.values()):
            continue
        if not all(p is not None and len(p) == cfg.num_experts for p in parts.values()):
            raise HFError(f"layer {layer}: incomplete expert weights in the checkpoint")
        stack = {n: torch.stack([p[e] for e in range(cfg.num_experts)]) for n, p in parts.items()}
        ours[f"experts.{layer}.w13_EFD"] = torch.cat([stack["gate_proj"], stack["up_proj"]], dim=1)
        ours[f"experts.{layer}.w2_EDF"] = stack["down_proj"]
    return ours


def _state_from_export(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ours = {}
    for key, value in hf_state.items():
        name = _rename(key, _FROM_HF)
        if name is None:
            raise HFError(f"unknown weight {key!r} in a unipool export")
        ours[name] = value
    return ours


def import_hf(hf_dir: str | Path) -> Unipool:
    """Load a Mixtral / OLMoE / Qwen3-MoE directory (or a unipool export) as a unipool model (fp32, CPU)."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise HFError(f"no such directory: {hf_dir}")
    raw = _read_json(hf_dir / "config.json")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED:
        missing = _features_we_lack(raw)
        what = f": it has {'; '.join(missing)}" if missing else ""
        raise HFError(f"cannot import model_type {model_type!r}{what} (importable: {', '.join(SUPPORTED)})")

    if model_type == "unipool":
        if "unipool" not in raw:
            raise HFError(f"{hf_dir / 'config.json'} has no 'unipool' model config")
        cfg = ModelConfig.from_dict(raw["unipool"])
        state = _state_from_export(_load_hf_weights(hf_dir))
    else:
        AutoConfig = require("transformers", "hf", f"importing a {model_type} model").AutoConfig

        hf_cfg = AutoConfig.from_pretrained(str(hf_dir))  # family defaults for fields absent from config.json
        _check_supported(hf_cfg, model_type)
        cfg = _unipool_config_from_hf(hf_cfg, model_type)
        state = _state_from_family(_load_hf_weights(hf_dir), cfg)

    model = build_model(cfg, "cpu", init=False)
    load_state(model, state, hf_dir, optional=_TRAINING_BUFFERS, error=HFError)
    return model


def write_run(model: Unipool, out_dir: str | Path, tokenizer_json: Path | None = None, source: str = "",
              dtype: torch.dtype | None = None, force: bool = False) -> Path:
    """A run directory that every unipool command accepts: config.json, tokenizer.json, checkpoints/step_000000
    (weights stored in `dtype`, default the model's; `source` recorded in the checkpoint's meta.json).
    A non-empty `out_dir` needs `force`; a unipool run or checkpoint is refused (see check_target)."""
    out = Path(out_dir)
    check_target(out, force)
    tokenizer = tokenizer_json if tokenizer_json is not None and tokenizer_json.is_file() else None
    # with force, a config.json already there (a transformers directory's) is replaced: check_target has
    # refused a run
    Run.create(out, default_config().replace(model=model.config, preset="custom"), tokenizer,
               exist_ok=force).add_weights(model, 0, {"source": source}, dtype)
    return out


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def _add_dtype_arg(parser, auto: str) -> None:
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help=f"dtype of the written weights (auto: {auto})")


def add_export_args(parser) -> None:
    parser.add_argument("run", help="run directory, checkpoint directory or model.safetensors")
    parser.add_argument("--hf", required=True, metavar="DIR", help="output transformers directory")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json to ship (default: the run's tokenizer.json)")
    _add_dtype_arg(parser, "the dtype the checkpoint stores")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="split the weights into safetensors shards of at most this size, as save_pretrained does")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty directory (never into a unipool run or checkpoint)")


def cmd_export(args) -> int:
    require("transformers", "hf", "unipool export")
    max_shard = parse_size(args.max_shard_size)
    check_target(Path(args.hf), args.force)  # before the (slow) load
    model, meta = load_model(args.run)
    dtype = DTYPES[meta.get("dtype", "float32") if args.dtype == "auto" else args.dtype]
    tok = Path(args.tokenizer) if args.tokenizer else find_run_tokenizer(args.run)
    if tok is None:
        print("warning: no tokenizer.json found next to the run; exporting the model only")
    out = export_hf(model, tok, args.hf, dtype, max_shard, force=args.force)
    print(f"exported {model.param_counts()['total']:,} parameters ({str(dtype).removeprefix('torch.')}) to {out} "
          f"(load with AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True))")
    return 0


def add_import_args(parser) -> None:
    parser.add_argument("hf_dir", help="Hugging Face model directory (Mixtral, OLMoE, Qwen3-MoE or a unipool export)")
    parser.add_argument("--out", required=True, help="output run directory (config.json, tokenizer.json, checkpoints/)")
    _add_dtype_arg(parser, "the dtype the Hugging Face checkpoint stores")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty directory (never into a unipool run or checkpoint)")


def cmd_import(args) -> int:
    hf_dir = Path(args.hf_dir)
    check_apart(hf_dir, Path(args.out))
    check_target(Path(args.out), args.force)  # before the (slow) import
    model = import_hf(hf_dir)
    dtype = source_dtype(hf_dir) if args.dtype == "auto" else DTYPES[args.dtype]
    tokenizer = hf_dir / "tokenizer.json"
    if not tokenizer.is_file():
        print(f"warning: no tokenizer.json found in {hf_dir}; importing the model only")
    out = write_run(model, args.out, tokenizer, source=str(hf_dir.resolve()), dtype=dtype, force=args.force)
    c = model.config
    coef = ""
    if _read_json(hf_dir / "config.json").get("model_type") != "unipool":  # an export restores its own config
        coef = (f"; switch_loss_coef {c.switch_loss_coef:g} = router_aux_loss_coef x top-{c.top_k} / {c.n_layers} "
                "layers (the same balance loss at uniform load)")
    print(f"imported {model.param_counts()['total']:,} parameters ({c.n_layers} layers, {c.num_experts} experts, "
          f"top-{c.top_k}, {str(dtype).removeprefix('torch.')}) into {out}{coef}")
    return 0
