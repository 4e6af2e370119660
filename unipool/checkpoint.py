"""Checkpoints: safetensors weights + JSON metadata, resolvable from a run directory.

Layout of a run directory:
    RUN/config.json                      resolved config {"model": ..., "train": ..., "data": ...}
    RUN/tokenizer.json                   the tokenizer (HF tokenizers format)
    RUN/checkpoints/step_000100/model.safetensors
    RUN/checkpoints/step_000100/meta.json  {"step": ..., "model": {...model config...}, ...}
    RUN/checkpoints/LATEST               name of the newest complete checkpoint directory
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import UnipoolError
from .model import Unipool, build_model


class CheckpointError(UnipoolError):
    pass


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory, a checkpoint directory or a model.safetensors file -> the checkpoint directory."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no such run or checkpoint: {p}")
    if p.is_file():
        p = p.parent
    if (p / "model.safetensors").is_file():
        return p
    latest = p / "checkpoints" / "LATEST"
    if latest.is_file():
        ckpt = p / "checkpoints" / latest.read_text().strip()
        if (ckpt / "model.safetensors").is_file():
            return ckpt
        raise CheckpointError(f"{latest} points to {ckpt.name}, which has no model.safetensors")
    raise CheckpointError(f"{p} is neither a run directory with checkpoints nor a checkpoint directory")


def read_meta(ckpt_dir: Path) -> dict:
    meta_path = ckpt_dir / "meta.json"
    try:
        return json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"missing {meta_path}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"corrupt {meta_path}: {e}") from None


def save_model(model: Unipool, ckpt_dir: str | Path, meta: dict | None = None) -> None:
    """Weights as safetensors and the model config in meta.json (not atomic: see train.py)."""
    from safetensors.torch import save_file

    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(ckpt_dir / "model.safetensors"))
    (ckpt_dir / "meta.json").write_text(json.dumps({**(meta or {}), "model": model.config.to_dict()}, indent=2))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Unipool, dict]:
    """Load a model from a run directory, checkpoint directory or model.safetensors file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ckpt_dir = resolve_checkpoint(path)
    meta = read_meta(ckpt_dir)
    if "model" not in meta:
        raise CheckpointError(f"{ckpt_dir / 'meta.json'} has no model config")
    cfg = ModelConfig.from_dict(meta["model"])
    model = build_model(cfg, device, init=False)
    try:
        state = load_file(str(ckpt_dir / "model.safetensors"), device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"corrupt weights {ckpt_dir / 'model.safetensors'}: {e}") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise CheckpointError(f"{ckpt_dir}: weights do not match the config: {str(e).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise CheckpointError(f"{ckpt_dir}: weights do not match the config "
                              f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    return model, meta
