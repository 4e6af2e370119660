"""Checkpoints: safetensors weights + JSON metadata, resolvable from a run directory.

Layout of a run directory:
    RUN/config.json                      resolved config {"model": ..., "train": ..., "data": ...}
    RUN/tokenizer.json                   the tokenizer (HF tokenizers format)
    RUN/checkpoints/step_000100/model.safetensors
    RUN/checkpoints/step_000100/meta.json  {"step": ..., "model": {...model config...}, ...}
    RUN/checkpoints/LATEST               name of the newest complete checkpoint directory

A training checkpoint adds, next to the weights (see `save_checkpoint`):
    optimizer.pt          the full (unsharded) optimizer state, written by rank 0
    state_rank{r}.pt      per rank: RNG states (python, numpy, torch, cuda), the data sampler's
                          position, and the model's routing buffers (each rank keeps its own)
All .pt files hold tensors and plain containers only and are read with torch.load(weights_only=True).
The learning-rate schedule is a pure function of the step, so the step is its whole state.

Writes are atomic: files go into checkpoints/.tmp_step_XXXXXX, are fsynced, the directory is renamed
to step_XXXXXX, and only then is LATEST replaced (write + fsync + os.replace). A crash at any point
leaves LATEST naming the previous complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from unipool.errors import UnipoolError, read_json
from unipool.model.config import ModelConfig
from unipool.model.model import Unipool, build_model
from unipool.train import distributed as dist


class CheckpointError(UnipoolError):
    pass


# dtype names as checkpoints, exports and the command line spell them
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    return read_json(ckpt_dir / "meta.json", CheckpointError)


def main_dtype(tensors) -> torch.dtype:
    """The floating-point dtype that holds most of the elements (float32 if there is none)."""
    numel: dict[torch.dtype, int] = {}
    for t in tensors:
        if t.is_floating_point():
            numel[t.dtype] = numel.get(t.dtype, 0) + t.numel()
    return max(numel, key=numel.get) if numel else torch.float32


def save_model(model: Unipool, ckpt_dir: str | Path, meta: dict | None = None,
               dtype: torch.dtype | None = None) -> None:
    """Weights as safetensors and the model config in meta.json (not atomic: see save_checkpoint)."""
    save_weights(model.state_dict(), model.config, ckpt_dir, meta, dtype)


def save_weights(state: dict[str, torch.Tensor], cfg: ModelConfig, ckpt_dir: str | Path,
                 meta: dict | None = None, dtype: torch.dtype | None = None) -> None:
    """A full (unsharded) model state dict as model.safetensors, and meta.json with the model config and
    the dtype the weights are stored in (`dtype`: cast floating-point weights to it first)."""
    from safetensors.torch import save_file

    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    stored = main_dtype(state.values())
    save_file(state, str(ckpt_dir / "model.safetensors"))
    meta = {**(meta or {}), "dtype": str(stored).removeprefix("torch."), "model": cfg.to_dict()}
    (ckpt_dir / "meta.json").write_text(json.dumps(meta, indent=2))


def load_weights(ckpt_dir: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """model.safetensors of a checkpoint directory (the one reader of checkpoint weights)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = ckpt_dir / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"missing {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"corrupt weights {path}: {e}") from None


def load_state(model: Unipool, state: dict[str, torch.Tensor], where: str | Path,
               optional: tuple[str, ...] = (), error: type[UnipoolError] = CheckpointError) -> None:
    """Strict load: every tensor of the model present with its shape, nothing unknown (keys in
    `optional` may be missing). One line names what does not match."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise error(f"{where}: weights do not match the config: {str(e).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if k not in optional]
    if missing or unexpected:
        raise error(f"{where}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Unipool, dict]:
    """Load a model from a run directory, checkpoint directory or model.safetensors file."""
    ckpt_dir = resolve_checkpoint(path)
    meta = read_meta(ckpt_dir)
    if "model" not in meta:
        raise CheckpointError(f"{ckpt_dir / 'meta.json'} has no model config")
    model = build_model(ModelConfig.from_dict(meta["model"]), device, init=False)
    load_state(model, load_weights(ckpt_dir, device), ckpt_dir)
    return model, meta


# ---- training checkpoints ------------------------------------------------------------------------

def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_checkpoint_dir(root: Path, step: int) -> Path:
    return root / f".tmp_{checkpoint_name(step)}"


def begin_checkpoint(root: Path, step: int) -> Path:
    """Rank 0: a fresh temporary directory for checkpoint `step` (a leftover from a crash is removed)."""
    tmp = tmp_checkpoint_dir(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def save_torch(obj: object, path: Path) -> None:
    torch.save(obj, path)
    _fsync(path)


def commit_checkpoint(root: Path, step: int, keep_last: int, keep_every: int = 0) -> Path:
    """Rank 0, after every rank wrote its files: publish the temporary directory, point LATEST at it,
    then apply retention. Each step is atomic; LATEST changes only once the checkpoint is complete."""
    tmp, final = tmp_checkpoint_dir(root, step), root / checkpoint_name(step)
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if final.exists():  # the same step saved again after resuming from an earlier checkpoint
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    latest_tmp = root / "LATEST.tmp"
    latest_tmp.write_text(final.name + "\n")
    _fsync(latest_tmp)
    os.replace(latest_tmp, root / "LATEST")
    _fsync(root)
    prune_checkpoints(root, keep_last, keep_every)
    return final


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    found = []
    for p in root.glob("step_*"):
        if p.is_dir() and p.name[5:].isdigit():
            found.append((int(p.name[5:]), p))
    return sorted(found)


def prune_checkpoints(root: Path, keep_last: int, keep_every: int = 0) -> None:
    """Keep the newest `keep_last` checkpoints, every step divisible by `keep_every`, and LATEST's."""
    ckpts = list_checkpoints(root)
    latest = (root / "LATEST").read_text().strip() if (root / "LATEST").is_file() else None
    keep = {p for _, p in ckpts[-keep_last:]}
    for step, p in ckpts:
        if p in keep or p.name == latest or (keep_every > 0 and step % keep_every == 0):
            continue
        shutil.rmtree(p, ignore_errors=True)


def remove_stale_tmp(root: Path) -> None:
    for p in root.glob(".tmp_step_*"):
        shutil.rmtree(p, ignore_errors=True)


def load_torch(path: Path) -> dict:
    """torch.load(weights_only=True) with one-line errors for missing or corrupt files."""
    if not path.is_file():
        raise CheckpointError(f"missing {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- pickle/zip/EOF errors come in many types; all mean a corrupt file
        raise CheckpointError(f"corrupt {path}: {str(e).splitlines()[0][:200]}") from None


def save_checkpoint(root: Path, step: int, tokens: int, model: Unipool, optimizer, sampler, mode: str,
                    info: dist.DistInfo, keep_last: int, keep_every: int = 0) -> Path:
    """Atomic training checkpoint under `root` (RUN/checkpoints): full weights and optimizer state
    from rank 0, and each rank's RNG, sampler position and routing buffers. `restore_checkpoint`
    reads back exactly this."""
    model_state, optim_state = dist.full_state_dicts(model, optimizer, mode)
    if info.is_main:
        begin_checkpoint(root, step)
    dist.barrier()
    tmp = tmp_checkpoint_dir(root, step)
    if info.is_main:
        meta = {"step": step, "tokens": tokens, "world_size": info.world_size, "dist_mode": mode}
        save_weights(model_state, model.config, tmp, meta)
        save_torch(optim_state, tmp / "optimizer.pt")
    persistent = model.state_dict().keys()  # routing statistics, not the RoPE tables
    buffers = {k: v.detach().cpu().clone() for k, v in model.named_buffers() if k in persistent}
    save_torch({"rng": rng_state(), "sampler": sampler.state_dict(), "buffers": buffers},
               tmp / f"state_rank{info.rank}.pt")
    dist.barrier()
    final = root / checkpoint_name(step)
    if info.is_main:
        final = commit_checkpoint(root, step, keep_last, keep_every)
    dist.barrier()
    return final


def restore_checkpoint(ckpt_dir: Path, model: Unipool, optimizer, sampler, mode: str, info: dist.DistInfo) -> int:
    """The mirror of `save_checkpoint`: weights (into the unwrapped model, before wrapping), optimizer
    state (after wrapping), this rank's sampler position, routing buffers and RNG. Returns the step."""
    meta = read_meta(ckpt_dir)
    if meta.get("world_size", 1) != info.world_size:
        raise CheckpointError(f"cannot resume {ckpt_dir}: written by {meta.get('world_size')} "
                              f"process(es), now {info.world_size}")
    dist.load_optimizer_state(model, optimizer, load_torch(ckpt_dir / "optimizer.pt"), mode)
    state = load_torch(ckpt_dir / f"state_rank{info.rank}.pt")
    sampler.load_state_dict(state["sampler"])
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in state["buffers"]:
                buf.copy_(state["buffers"][name])
    set_rng_state(state["rng"])
    return int(meta["step"])


def rng_state() -> dict:
    """Every random generator the training loop touches, as tensors and plain containers."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
